"""``python -m llm_training.main``: the main job (prepare, train, report, sample).

The module itself is callable, so ``from llm_training import main; main()`` works even when this module was
imported first and Python bound the name ``llm_training.main`` to it.
"""

import sys
import types

from llm_training.cli.main_job import cli_main, main


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return main(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
