"""Registry entries, one module per layer; each module calls
``verification.registry.register`` at import time."""
