"""YAML recipes for training with SE: the schema, what it builds, and the runner.

- :mod:`~composer_se.recipes.config`: the schema and loader (YAML, ``base`` recipes,
  dotted overrides); each section checks its own values;
- :mod:`~composer_se.recipes.builders`: optimizer, scheduler, algorithms and loggers;
- :mod:`~composer_se.recipes.models` and :mod:`~composer_se.recipes.data`: models by
  name, datasets and dataloaders;
- :mod:`~composer_se.recipes.run`: recipe -> ``Trainer`` -> fit
  (``composer -m composer_se.train``);
- :mod:`~composer_se.recipes.resume` and :mod:`~composer_se.recipes.safe_load`: safe
  checkpoint reading, checks against the model, autoresume after a kill;
- :mod:`~composer_se.recipes.cli`: the ``composer-se`` command.

The library (everything outside this package) never imports it.
"""
