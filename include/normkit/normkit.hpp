// normkit/normkit.hpp: the umbrella header -- every module and free function.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_NORMKIT_HPP_
#define NORMKIT_NORMKIT_HPP_

// The umbrella header: every module and free function. Pulls in
// <unsupported/Eigen/CXX11/Tensor>.
#include <normkit/batch_norm.hpp>
#include <normkit/config.hpp>
#include <normkit/error.hpp>
#include <normkit/fold.hpp>
#include <normkit/group_norm.hpp>
#include <normkit/instance_norm.hpp>
#include <normkit/isa.hpp>
#include <normkit/layer_norm.hpp>
#include <normkit/options.hpp>
#include <normkit/precise_bn.hpp>
#include <normkit/rms_norm.hpp>
#include <normkit/version.hpp>

#endif  // NORMKIT_NORMKIT_HPP_
