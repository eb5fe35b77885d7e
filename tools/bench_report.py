#!/usr/bin/env python3
"""Run normkit_bench and turn its results into a Markdown table and an SVG bar chart.

    tools/bench_report.py --binary /tmp/nkbench-build/benchmarks/normkit_bench \\
        --repetitions 3 --markdown bench.md --svg bench.svg --json-out bench.json
    tools/bench_report.py --json-in bench.json --markdown - --svg bench.svg   # re-render

The binary runs with --benchmark_format=json --benchmark_repetitions=N
--benchmark_report_aggregates_only=true (and --benchmark_enable_random_interleaving=true
unless --no-interleave); every number is the median over the N repetitions (each
repetition is the mean wall time per call over Google Benchmark's run).

Benchmark names are BM_<family>/<case>/<mode>/threads:<n>/<impl>[/real_time], with
impl one of normkit (free functions), normkit_module (the modules: training forward
with set_keep_input(false), evaluation forward, backward(x, dy) into reused gradients),
eigen_naive, libtorch, onednn (modes train, eval, backward; RMSNorm, the same in training
and evaluation, runs forward and backward) or memcpy, stream (family Floor, mode copy);
the label is the shape-suite case id (oneDNN's runs append " onednn:<implementation>",
listed under the table). Cases whose id ends in -bf16 are bfloat16 (B counts 2 bytes an
element); when the float32 case of the same id without the suffix ran too, a table
compares the two.

Floor: for a case of B bytes and a thread count, W = 2B / (median time of the memcpy
probe BM_Floor/<case>/copy/threads:<n>/memcpy of the same run), and the floor time of a
mode is model_bytes / W, where model_bytes (exported by the binary) is the traffic
model: eval 2B (BatchNorm; 3B for norms that compute statistics in eval), training
forward 3B, RMSNorm forward 3B, backward 5B. "x floor" = time / floor time. The binary's own floor_ratio
counter uses a memcpy timed once at startup instead; the two agree within noise.

Python 3 standard library only.
"""
import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
from collections import OrderedDict

IMPLS = ("normkit", "normkit_module", "eigen_naive", "libtorch", "onednn")
MODES = ("train", "eval", "forward", "backward")
LOW_SUFFIX = "-bf16"  # case ids of the bfloat16 cases: <float32 case id>-bf16
NAME_RE = re.compile(
    r"^BM_(?P<family>[^/]+)/(?P<case>[^/]+)/(?P<mode>[^/]+)/threads:(?P<threads>\d+)/(?P<impl>[^/]+)")
UNIT = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
SLOW_FLOOR = 1.3  # rows above this many x floor are flagged
PREEMPTED = 0.85  # 1-thread runs with cpu/wall below this are marked as disturbed


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        if names:
            return "%s (%d logical CPUs)" % (names[0], len(names))
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_binary(args):
    cmd = [args.binary, "--benchmark_format=json",
           "--benchmark_repetitions=%d" % args.repetitions,
           "--benchmark_report_aggregates_only=true"]
    if args.min_time is not None:
        cmd.append("--benchmark_min_time=%g" % args.min_time)
    if args.filter:
        cmd.append("--benchmark_filter=%s" % args.filter)
    if args.interleave:
        # Repetitions of all benchmarks in random order: a burst of load from another
        # process then spreads over implementations instead of hitting one.
        cmd.append("--benchmark_enable_random_interleaving=true")
    if args.smoke:
        cmd.append("--smoke")
    if args.isa:
        cmd.append("--isa=%s" % args.isa)
    env = dict(os.environ)
    if args.thp:
        # glibc >= 2.35: malloc madvise(MADV_HUGEPAGE)s its memory, for all three libraries.
        env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    print("running: %s%s" % ("GLIBC_TUNABLES=glibc.malloc.hugetlb=1 " if args.thp else "",
                             " ".join(cmd)), file=sys.stderr)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, universal_newlines=True, env=env)
    if proc.returncode != 0:
        print("warning: %s exited with %d (some benchmarks reported errors)"
              % (args.binary, proc.returncode), file=sys.stderr)
    return json.loads(proc.stdout)


def collect(data):
    """{(case_label, family, case, mode, threads, impl): record} for the median aggregates."""
    results = {}
    errors = []
    for b in data.get("benchmarks", []):
        name = b.get("run_name") or b["name"]
        name = name.replace("/real_time", "")
        m = NAME_RE.match(name)
        if not m:
            continue
        if b.get("error_occurred"):
            errors.append("%s: %s" % (name, b.get("error_message", "")))
            continue
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        key = (m.group("family"), m.group("case"), m.group("mode"), int(m.group("threads")), m.group("impl"))
        unit = UNIT[b.get("time_unit", "ns")]
        label, _, impl_info = b.get("label", "").partition(" onednn:")
        results[key] = {
            "order": b.get("family_index", len(results)),
            "time": b["real_time"] * unit,
            "cpu": b.get("cpu_time", 0.0) * unit,
            "label": label,
            "impl_info": impl_info,
            "model_bytes": float(b.get("model_bytes", 0.0)),
            "B": float(b.get("B", 0.0)),
        }
    # Registration order (the binary registers the suite's order), whatever order the
    # interleaved run reported them in.
    results = OrderedDict(sorted(results.items(), key=lambda kv: kv[1]["order"]))
    return results, errors


def fmt_time(s):
    if s is None:
        return "—"
    if s < 1e-6:
        return "%.0f ns" % (s * 1e9)
    if s < 1e-3:
        return "%.3g µs" % (s * 1e6)
    return "%.3g ms" % (s * 1e3)


def build_rows(results):
    """One row per (case, mode, threads) in the binary's order."""
    cases = OrderedDict()  # (family, case) -> label
    for (family, case, mode, threads, impl), r in results.items():
        if family != "Floor":
            cases.setdefault((family, case), r["label"] or "%s/%s" % (family, case))
    floor = {}
    for (family, case, mode, threads, impl), r in results.items():
        if family == "Floor":
            floor[(case, threads, impl)] = r
    rows = []
    for (family, case), label in cases.items():
        for mode in MODES:
            for threads in (1, 2):
                row = {"label": label, "family": family, "case": case, "mode": mode, "threads": threads}
                row["preempted"] = []
                for impl in IMPLS:
                    r = results.get((family, case, mode, threads, impl))
                    row[impl] = r["time"] if r else None
                    # On one thread, CPU time well below wall time means the process was
                    # descheduled (another job on the machine): that time is suspect.
                    if r and threads == 1 and r["cpu"] < PREEMPTED * r["time"]:
                        row["preempted"].append(impl)
                    if r:
                        row["model_bytes"], row["B"] = r["model_bytes"], r["B"]
                        if impl == "onednn" and r.get("impl_info"):
                            row["onednn_impl"] = r["impl_info"]
                if row["normkit"] is None and not any(row[i] for i in IMPLS):
                    continue
                mc = floor.get((case, threads, "memcpy"))
                row["W"] = 2.0 * mc["B"] / mc["time"] if mc and mc["time"] > 0 else None
                mb = row.get("model_bytes")
                row["floor_time"] = mb / row["W"] if mb and row["W"] else None
                rows.append(row)
    return rows, floor, cases


def markdown(rows, floor, cases, data, reps):
    ctx = data.get("context", {})
    out = []
    out.append("# normkit benchmark results\n")
    out.append("- CPU: %s" % cpu_model())
    out.append("- Threads: 1 and 2 (normkit/naive Eigen: Eigen::ThreadPoolDevice; libtorch: "
               "at::set_num_threads; oneDNN: omp_set_num_threads)")
    out.append("- libtorch: %s; oneDNN: %s; normkit compiled with: %s" % (
        ctx.get("libtorch", "not built"), ctx.get("onednn", "not built"), ctx.get("normkit_flags", "?")))
    isa, cpu_isa = ctx.get("normkit_isa", "?"), ctx.get("normkit_cpu_isa", "?")
    proxy = ""
    if isa != cpu_isa:
        proxy = (" — all three libraries capped below what this CPU has: a proxy for a CPU "
                 "whose best is %s, not a measurement on one" % isa)
    out.append("- ISA paths: normkit %s (CPU best: %s, chosen at run time); libtorch "
               "ATEN_CPU_CAPABILITY=%s; oneDNN ONEDNN_MAX_CPU_ISA=%s%s" % (
                   isa, cpu_isa, ctx.get("ATEN_CPU_CAPABILITY", "?"),
                   ctx.get("ONEDNN_MAX_CPU_ISA", "?"), proxy))
    if "glibc_tunables" in ctx:  # runs since the shared buffers (session 7)
        out.append("- Memory: %s (GLIBC_TUNABLES: %s); every implementation of a case reads the "
                   "same input buffers, and normkit and oneDNN write the same outputs" % (
                       "transparent huge pages" if "hugetlb=1" in ctx["glibc_tunables"]
                       else "default pages", ctx["glibc_tunables"]))
    if "normkit_streaming_store_bytes" in ctx:  # runs since session 10
        sb = ctx["normkit_streaming_store_bytes"]
        out.append("- normkit streaming stores for outputs of at least %s (streaming_store_bytes(): "
                   "the last-level cache the OS reports unless NORMKIT_STREAMING_STORE_BYTES is set)"
                   % (sb if sb == "never" else "%.1f MB" % (int(sb) / 1e6)))
    out.append("- Date: %s; host: %s; load average at start: %s; repetitions: %d (medians)" % (
        ctx.get("date", "?"), ctx.get("host_name", "?"), ", ".join("%.2f" % x for x in ctx.get("load_avg", [])),
        reps))
    out.append("- Traffic model: eval 2B (BatchNorm with running stats; 3B for LayerNorm/GroupNorm/"
               "InstanceNorm, which compute statistics in eval too), training forward 3B, RMSNorm forward "
               "(the same in training and eval) 3B, backward 5B; B = elements × element size (4 float32, "
               "2 bfloat16: the *-bf16 cases); floor = model bytes / memcpy bandwidth of the same B and "
               "thread count, same run.")
    out.append("- Speed-up = peer time / normkit time (> 1: normkit faster). **Bold**: normkit slower "
               "than a peer, or above %.1f× floor. †: 1-thread run whose CPU time is below %d%% of its "
               "wall time (descheduled by other load: read with care).\n" % (SLOW_FLOOR, PREEMPTED * 100))
    out.append("| case | mode | thr | normkit | GB/s | ×floor | module | ×free fn | naive Eigen | "
               "libtorch | speed-up | oneDNN | speed-up |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        nk = r["normkit"]
        gbs = r["model_bytes"] / nk / 1e9 if nk and r.get("model_bytes") else None
        xf = nk / r["floor_time"] if nk and r.get("floor_time") else None

        def sp(peer):
            t = r[peer]
            if t is None or not nk:
                return "—"
            s = t / nk
            return ("**%.2f**" if s < 1.0 else "%.2f") % s

        xf_s = "—" if xf is None else (("**%.2f**" if xf > SLOW_FLOOR else "%.2f") % xf)

        def tm(impl):
            return fmt_time(r[impl]) + (" †" if impl in r["preempted"] else "")

        mod = r["normkit_module"]
        mod_ratio = "—" if not (mod and nk) else (("**%.2f**" if mod / nk > 1.05 else "%.2f") % (mod / nk))
        out.append("| %s | %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["label"], r["mode"], r["threads"], tm("normkit"), "—" if gbs is None else "%.1f" % gbs, xf_s,
            tm("normkit_module"), mod_ratio, tm("eigen_naive"), tm("libtorch"), sp("libtorch"), tm("onednn"),
            sp("onednn")))
    out.append(low_vs_float(rows))
    impls = onednn_impls(rows)
    if impls:
        out.append("\noneDNN implementations (`impl_info_str` of the timed primitive):\n")
        out.extend("- %s %s: %s" % k for k in impls)
    out.append("\nFloor probes (copy of B bytes; bandwidth counts read + write):\n")
    out.append("| case | B | memcpy 1 thr | stream 1 thr | memcpy 2 thr | stream 2 thr |")
    out.append("|---|---|---|---|---|---|")
    seen = set()
    for (family, case), label in cases.items():
        if case in seen:
            continue
        seen.add(case)
        cells = []
        B = None
        for threads in (1, 2):
            for impl in ("memcpy", "stream"):
                f = floor.get((case, threads, impl))
                if f:
                    B = f["B"]
                    cells.append("%s (%.1f GB/s)" % (fmt_time(f["time"]), 2 * f["B"] / f["time"] / 1e9))
                else:
                    cells.append("—")
        out.append("| %s | %s | %s |" % (label, "—" if B is None else "%.3g MB" % (B / 1e6), " | ".join(cells)))
    return "\n".join(out) + "\n"


def low_vs_float(rows):
    """bfloat16 against float32 for the same shape: rows of case <id>-bf16 next to case <id>
    (when both ran), as float32 time / bfloat16 time (> 1: bfloat16 faster)."""
    by = {(r["label"], r["mode"], r["threads"]): r for r in rows}
    lines = []
    for r in rows:
        if not r["label"].endswith(LOW_SUFFIX):
            continue
        f = by.get((r["label"][:-len(LOW_SUFFIX)], r["mode"], r["threads"]))
        if not f:
            continue

        def pair(impl):
            a, b = f.get(impl), r.get(impl)
            if not a or not b:
                return ["—", "—", "—"]
            return [fmt_time(a), fmt_time(b), "%.2f" % (a / b)]

        lines.append("| %s | %s | %d | %s |" % (
            r["label"], r["mode"], r["threads"],
            " | ".join(pair("normkit") + pair("normkit_module") + pair("libtorch")[2:])))
    if not lines:
        return ""
    head = ["\nbfloat16 against float32 for the same shape (speed-up = float32 time / bfloat16 time; "
            "normkit: float32 free function vs all-bfloat16 free function; module: float32 module vs "
            "the same float module given bfloat16 x, i.e. mixed):\n",
            "| case | mode | thr | normkit f32 | normkit bf16 | speed-up | module f32 | module mixed | "
            "speed-up | libtorch speed-up |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    return "\n".join(head + lines)


def onednn_impls(rows):
    """[(case, mode, implementation)] of the oneDNN runs, one per case and mode."""
    seen = OrderedDict()
    for r in rows:
        info = r.get("onednn_impl")
        if info:
            seen.setdefault((r["label"], r["mode"]), set()).add(info)
    return [(label, mode, ", ".join(sorted(v))) for (label, mode), v in seen.items()]


def compact(rows):
    """The same results, one line per (case, mode): both thread counts side by side, peers
    as speed-ups only (peer time / normkit time)."""
    by = OrderedDict()
    for r in rows:
        by.setdefault((r["label"], r["mode"]), {})[r["threads"]] = r
    out = ["| case | mode | normkit 1T | ×floor | vs torch | vs oneDNN | normkit 2T | ×floor | vs torch | vs oneDNN |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for (label, mode), g in by.items():
        cells = []
        for t in (1, 2):
            r = g.get(t)
            if not r or not r["normkit"]:
                cells += ["—"] * 4
                continue
            nk = r["normkit"]
            xf = nk / r["floor_time"] if r.get("floor_time") else None
            mark = " †" if "normkit" in r["preempted"] else ""
            cells.append(fmt_time(nk) + mark)
            cells.append("—" if xf is None else (("**%.2f**" if xf > SLOW_FLOOR else "%.2f") % xf))
            for peer in ("libtorch", "onednn"):
                if r[peer]:
                    sp = r[peer] / nk
                    cells.append(("**%.2f**" if sp < 1 else "%.2f") % sp + (" †" if peer in r["preempted"] else ""))
                else:
                    cells.append("—")
        out.append("| %s | %s | %s |" % (label, mode, " | ".join(cells)))
    return "\n".join(out) + "\n"


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg_chart(rows, title):
    """Grouped bars of effective bandwidth (model bytes / time, GB/s) per case and mode, one
    panel per thread count; the floor bar is the memcpy bandwidth W (the bandwidth an
    implementation moving exactly the model bytes at memcpy speed would show)."""
    series = [("normkit", "#1f77b4"), ("libtorch", "#ff7f0e"), ("onednn", "#2ca02c"), ("floor", "#9e9e9e")]
    names = {"normkit": "normkit", "libtorch": "libtorch", "onednn": "oneDNN", "floor": "floor (memcpy W)"}
    bar_w, gap, left, right, top, panel_h, label_h = 9, 10, 60, 20, 70, 280, 150
    panels = [t for t in (1, 2) if any(r["threads"] == t for r in rows)]
    groups = OrderedDict()
    for r in rows:
        groups.setdefault((r["label"], r["mode"]), {})[r["threads"]] = r
    n = len(groups)
    group_w = len(series) * bar_w + gap
    width = left + right + n * group_w
    height = top + len(panels) * (panel_h + label_h) + 20
    o = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" '
         'font-size="11">' % (width, height),
         '<rect width="100%" height="100%" fill="white"/>',
         '<text x="%d" y="20" font-size="14" font-weight="bold">%s</text>' % (left, esc(title))]
    lx = left
    for key, color in series:
        o.append('<rect x="%d" y="30" width="10" height="10" fill="%s"/>' % (lx, color))
        o.append('<text x="%d" y="39">%s</text>' % (lx + 14, esc(names[key])))
        lx += 30 + 7 * len(names[key])
    for p, threads in enumerate(panels):
        y0 = top + p * (panel_h + label_h) + 10
        vals = []
        for g in groups.values():
            r = g.get(threads)
            if not r:
                continue
            for key, _ in series:
                v = bandwidth(r, key)
                if v:
                    vals.append(v)
        # Log scale: the suite spans a 384-byte case and 30 MB ones.
        lo = 10 ** math.floor(math.log10(min(vals))) if vals else 0.1
        hi = 10 ** math.ceil(math.log10(max(vals))) if vals else 1.0
        if hi <= lo:
            hi = lo * 10
        span = math.log10(hi) - math.log10(lo)

        def ypos(v):
            return base - panel_h * (math.log10(max(v, lo)) - math.log10(lo)) / span

        base = y0 + panel_h
        o.append('<text x="%d" y="%d" font-weight="bold">%d thread%s — effective GB/s '
                 '(model bytes / time, log scale; higher is better)</text>' % (
                     left, y0 - 8, threads, "" if threads == 1 else "s"))
        d = lo
        while d <= hi * 1.0001:
            y = ypos(d) + 0.5
            o.append('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#ccc"/>' % (left, width - right, y, y))
            o.append('<text x="%d" y="%.1f" text-anchor="end">%g</text>' % (left - 4, y + 4, d))
            for k in (2, 5):
                if d * k < hi:
                    yk = ypos(d * k) + 0.5
                    o.append('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#eee"/>' % (
                        left, width - right, yk, yk))
            d *= 10
        for gi, ((label, mode), g) in enumerate(groups.items()):
            x = left + gi * group_w + gap // 2
            r = g.get(threads)
            if r:
                for si, (key, color) in enumerate(series):
                    v = bandwidth(r, key)
                    if not v:
                        continue
                    h = base - ypos(v)
                    t = r["floor_time"] if key == "floor" else r.get(key)
                    o.append('<rect x="%d" y="%.1f" width="%d" height="%.1f" fill="%s"><title>%s %s %d thr, %s: '
                             '%.1f GB/s (%s)</title></rect>' % (
                                 x + si * bar_w, base - h, bar_w - 1, h, color, esc(label), mode, threads,
                                 esc(names[key]), v, fmt_time(t)))
            lxx = x + len(series) * bar_w / 2
            o.append('<text transform="translate(%.1f,%d) rotate(-55)" text-anchor="end">%s %s</text>' % (
                lxx, base + 12, esc(label), mode))
        o.append('<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="black"/>' % (left, width - right, base, base))
    o.append("</svg>")
    return "\n".join(o) + "\n"


def bandwidth(r, key):
    mb = r.get("model_bytes")
    if not mb:
        return None
    if key == "floor":
        return r["W"] / 1e9 if r.get("W") else None
    t = r.get(key)
    return mb / t / 1e9 if t else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", help="path to normkit_bench")
    ap.add_argument("--json-in", help="render an earlier run's JSON instead of running the binary")
    ap.add_argument("--json-out", help="also save the raw JSON here")
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=None, help="--benchmark_min_time (seconds)")
    ap.add_argument("--filter", default=None, help="--benchmark_filter regex")
    ap.add_argument("--no-interleave", dest="interleave", action="store_false",
                    help="run each benchmark's repetitions back to back (default: random interleaving)")
    ap.add_argument("--smoke", action="store_true", help="pass --smoke (shrunken shapes)")
    ap.add_argument("--thp", action="store_true",
                    help="run on transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)")
    ap.add_argument("--isa", default=None, help="pass --isa=LEVEL (normkit and the peers capped alike)")
    ap.add_argument("--markdown", default="-", help="Markdown output file ('-': stdout)")
    ap.add_argument("--svg", default="bench.svg", help="SVG output file ('' to skip)")
    ap.add_argument("--compact", default=None,
                    help="also write a compact table (one line per case and mode) to this file ('-': stdout)")
    args = ap.parse_args()
    if args.json_in:
        with open(args.json_in) as f:
            data = json.load(f)
    elif args.binary:
        data = run_binary(args)
    else:
        ap.error("give --binary or --json-in")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(data, f, indent=1)
    results, errors = collect(data)
    rows, floor, cases = build_rows(results)
    reps = max([b.get("repetitions", 1) for b in data.get("benchmarks", [])] or [args.repetitions])
    md = markdown(rows, floor, cases, data, reps)
    if errors:
        md += "\nErrors:\n\n" + "\n".join("- " + e for e in errors) + "\n"
    if args.markdown == "-":
        sys.stdout.write(md)
    else:
        with open(args.markdown, "w") as f:
            f.write(md)
    if args.compact:
        text = compact(rows)
        if args.compact == "-":
            sys.stdout.write(text)
        else:
            with open(args.compact, "w") as f:
                f.write(text)
    if args.svg:
        title = "normkit vs libtorch vs oneDNN vs memcpy floor — %s" % cpu_model()
        with open(args.svg, "w") as f:
            f.write(svg_chart(rows, title))
        print("wrote %s" % os.path.abspath(args.svg), file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
