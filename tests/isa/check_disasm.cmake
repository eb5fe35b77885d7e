# Reads the disassembly of disasm.cpp's object: every leaf kernel of the AVX-512 copy
# (isa_avx512::) must use zmm registers somewhere, and no function of the baseline copy
# (isa_base::) may contain a VEX- or EVEX-encoded instruction (ymm/zmm registers or a
# v-prefixed SSE/AVX mnemonic), which would fault on a CPU without AVX; and both copies'
# float applies contain streaming stores.
execute_process(COMMAND ${OBJDUMP} -d --no-show-raw-insn -C ${OBJECT}
                OUTPUT_VARIABLE dis RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "objdump failed")
endif()
string(REPLACE "\n\n" ";" funcs "${dis}")
# Stops with `what` and the name of the function whose disassembly is f.
function(reject f what)
  string(REGEX MATCH "<[^>\n]*>:" name "${f}")
  message(FATAL_ERROR "${what}: ${name}")
endfunction()
set(n512 0)
set(nbase 0)
set(nstream 0)
foreach(f IN LISTS funcs)
  # Streaming stores (kernels/simd.hpp: stream()) are compiled into the float applies.
  if(f MATCHES "isa_(avx512|base)::affine_rows<float>")
    math(EXPR nstream "${nstream} + 1")
    if(NOT f MATCHES "movntps")
      reject("${f}" "float apply without streaming stores")
    endif()
  endif()
  if(f MATCHES "isa_avx512::(mom_rows|grad_rows|mom_cols|grad_cols|affine_rows|affine_cols|gradin_rows|gradin_cols|ln_affine_rows|ln_bwd_impl)<")
    math(EXPR n512 "${n512} + 1")
    if(NOT f MATCHES "zmm")
      reject("${f}" "AVX-512 copy without zmm")
    endif()
  elseif(f MATCHES "isa_base::[a-z_]+<")
    math(EXPR nbase "${nbase} + 1")
    if(f MATCHES "[xyz]mm[0-9]+" AND f MATCHES "(ymm|zmm|\tv[a-z0-9]+ )")
      reject("${f}" "baseline copy with a VEX/EVEX instruction")
    endif()
  endif()
endforeach()
if(n512 EQUAL 0 OR nbase EQUAL 0 OR nstream LESS 2)
  message(FATAL_ERROR
          "no kernel functions found (${n512} AVX-512, ${nbase} baseline, ${nstream} float applies)")
endif()
message(STATUS "${n512} AVX-512 kernel functions use zmm; ${nbase} baseline ones have no VEX; "
               "${nstream} float applies stream")
