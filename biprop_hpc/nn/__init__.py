"""BIPROP primitives: layers with frozen random weights and learned top-k masks, the mask engine that computes
all layers' effective weights together, binary activation, inits."""
from biprop_hpc.nn.engine import MaskEngine, attach_mask_engine, detach_mask_engine, fixed_effective_weights
from biprop_hpc.nn.init import FAN_SCALES, WEIGHT_INITS, init_scores_, init_weight_
from biprop_hpc.nn.layers import (BinaryActivation, BipropConv2d, BipropLinear, BipropMixin, biprop_layers,
                                  check_keep_ratio, kept_count, set_keep_ratio, topk_mask)

__all__ = ["BinaryActivation", "BipropConv2d", "BipropLinear", "BipropMixin", "FAN_SCALES", "MaskEngine", "WEIGHT_INITS",
           "attach_mask_engine", "detach_mask_engine", "biprop_layers", "check_keep_ratio", "fixed_effective_weights", "init_scores_",
           "init_weight_", "kept_count", "set_keep_ratio", "topk_mask"]
