"""The shipped configs (``*.yaml``: quickstart, wikipedia, dckt_wikipedia) and the
``raycmr config`` command (``cli``)."""
