"""The ``peft-locas`` command line, one module per command (``memorize``, ``merge``, ``eval``, ``ask``, ``chat``).

Every command module has ``add_parser(commands)`` and ``run(args)``; the parsers import nothing heavy, so ``--help``
and argument errors answer at once, and every input that can be checked without the model is checked before it loads.
"""
