"""``python -m composer_se.train RECIPE [key=value ...]``: the recipe runner, :mod:`composer_se.recipes.run`.

This entry point only hands over to the recipes, so that ``composer -n 8 -m
composer_se.train ...`` stays short.
"""

import sys

from composer_se.recipes.run import main

if __name__ == '__main__':
    sys.exit(main())
