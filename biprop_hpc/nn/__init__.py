"""BIPROP primitives: layers with frozen random weights and learned top-k masks, binary activation, inits."""
from biprop_hpc.nn.init import WEIGHT_INITS, init_scores_, init_weight_
from biprop_hpc.nn.layers import (BinaryActivation, BipropConv2d, BipropLinear, BipropMixin,
                                  biprop_layers, check_keep_ratio, fixed_effective_weights, kept_count, set_keep_ratio,
                                  topk_mask)

__all__ = ["BinaryActivation", "BipropConv2d", "BipropLinear", "BipropMixin", "WEIGHT_INITS",
           "biprop_layers", "check_keep_ratio", "fixed_effective_weights", "init_scores_", "init_weight_", "kept_count",
           "set_keep_ratio", "topk_mask"]
