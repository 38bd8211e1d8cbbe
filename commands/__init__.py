"""The commands other than lte-server and lte-worker (whose CLIs live with their roles):
``lte-sim`` (``sim``: the emulator, on the server's aggregator and snapshot code), ``lte-eval``
(``eval``), ``lte-generate`` (``generate``) and ``lte-prepare-text`` (``prepare_text``). They sit on
top: they may import any role; no role imports them."""
