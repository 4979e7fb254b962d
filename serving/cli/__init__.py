"""The ``modeld`` command line, on top of everything: :mod:`~serving.cli.main` (the parser and
``main``), :mod:`~serving.cli.serve`, :mod:`~serving.cli.ops` and :mod:`~serving.cli.demo`."""
