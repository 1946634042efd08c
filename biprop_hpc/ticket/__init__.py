"""Tickets: a found Multi-Prize Ticket as a small standalone file, and the network rebuilt from it.

    from biprop_hpc.ticket import load
    model = load("best.ticket.h5")            # an eval-mode nn.Module: plain Conv2d/Linear holding W_eff
    logits = model(images)

- `load(path, device="cpu")`: the network of a ticket (see export.load); the loader every command uses.
- `read(path)`: the raw contents (config, input geometry, per-layer mask bits, sign bits, alpha, kept count;
  `Ticket` / `LayerRecord`), for engines that compute from the bits.
- `dense_ternary(model)`: any model's BIPROP layers replaced by plain layers holding W_eff.
- `export_ticket(checkpoint, out)`, `import_original(ckpt, model, ...)`, `write_ticket(path, ticket)`.
The file format is documented in biprop_hpc/ticket/file.py (schema version 2, verified by SHA-256 on every read).
"""
from biprop_hpc.lazy import lazy_names

# Imported on first use: the command line imports ticket.commands without torch or h5py.
__getattr__ = lazy_names(__name__, {**dict.fromkeys(("dense_ternary", "export_ticket", "load", "module_from_ticket",
                                                     "ticket_from_checkpoint"), "export"),
                                    **dict.fromkeys(("SCHEMA_VERSION", "LayerRecord", "Ticket", "TicketError", "read",
                                                     "write_ticket"), "file")})


def import_original(*args, **kwargs):
    """The ticket of a checkpoint of the original biprop code (see biprop_hpc.ticket.original)."""
    from biprop_hpc.ticket.original import import_original as run
    return run(*args, **kwargs)


def evaluate_ticket(*args, **kwargs):
    """Metrics of a ticket's network on its dataset (see biprop_hpc.ticket.commands.evaluate_ticket)."""
    from biprop_hpc.ticket.commands import evaluate_ticket as run
    return run(*args, **kwargs)


__all__ = ["SCHEMA_VERSION", "LayerRecord", "Ticket", "TicketError", "dense_ternary", "evaluate_ticket",
           "export_ticket", "import_original", "load", "module_from_ticket", "read", "ticket_from_checkpoint",
           "write_ticket"]
