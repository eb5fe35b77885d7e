// Instantiates every leaf kernel of every ISA copy (float and double) so that
// check_disasm.cmake can read their instructions.
#include <normkit/normkit.hpp>

const void* normkit_disasm_tables[] = {
    &normkit::detail::leaves<float>(), &normkit::detail::leaves<double>(),
    &normkit::detail::ln_leaves<float>(), &normkit::detail::ln_leaves<double>()};
