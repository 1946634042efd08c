"""biprop-hpc: find Multi-Prize Tickets (BIPROP) in random networks, from a laptop to a GPU supercomputer."""

__version__ = "0.1.0"
