"""The ``edgemoe`` subcommands, a module each (``add_parser`` and the command's
body), composed by ``edgemoe.cli``. ``options`` holds the flags several commands
share (loading, sampling) and turns them into ``edgemoe.load`` options and one
``SamplingParams``; ``probe`` measures this device for ``profile``.

Modules import the runtime and converters inside the functions that use them,
so building the parser (``edgemoe --help``) stays light.
"""
