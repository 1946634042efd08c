"""The names that config keys choose among, free of torch: the command line (its --help, shell completion and
config validation) is built from them without importing torch, so `biprop --help` starts at once.

The modules that implement them take these names from here (nn.init, models.builder, data.build);
data.datasets' DATASETS, whose entries hold the readers, is checked against FILE_DATASETS by tests/test_cli.py.
"""

# Datasets read from their original files (data.datasets.DATASETS) and datasets that are image trees.
FILE_DATASETS = ("fashion-mnist", "mnist", "cifar10")
IMAGE_TREE_DATASETS = ("imagefolder", "imagenet")

# Loaders of image trees.
LOADERS = ("auto", "dali", "dali-cpu", "torch")

# The whole network: BIPROP search, or an ordinary trained baseline.
LAYER_TYPES = ("biprop", "dense")
# The first / last layer: as the rest, dense trained, dense frozen random.
EDGE_LAYER_TYPES = ("biprop", "trained", "frozen")

# Weight inits: name -> (distribution, fan scaled by the keep ratio?); see biprop_hpc.nn.init.
WEIGHT_INITS = {
    "kn": ("normal", True),
    "ukn": ("normal", False),
    "sc": ("signed_constant", True),
    "usc": ("signed_constant", False),
    "uc": ("constant", True),
    "uuc": ("constant", False),
}

# How the scaled inits scale the fan (see biprop_hpc.nn.init); kept_fraction is the default.
FAN_SCALES = ("kept_fraction", "pruned_fraction", "none")

# What `biprop export --format` writes (biprop_hpc.ticket.formats).
TICKET_FORMATS = ("ticket", "torch", "onnx")
