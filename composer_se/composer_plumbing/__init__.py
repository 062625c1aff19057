"""Everything in composer-se that knows how Composer works inside, in one place.

- :mod:`~composer_se.composer_plumbing.registration`: the repr prefix our algorithm is
  saved under (``composer_se.SqueezeExcite(...)``) and the entry under
  ``composer.algorithms`` that lets Composer's checkpoint loader rebuild it;
- :mod:`~composer_se.composer_plumbing.checkpoint_guard`: the algorithm's check of a
  checkpoint's SE blocks while the Trainer loads it;
- :mod:`~composer_se.composer_plumbing.checkpoint_reader`: the recipes' replacement
  for the function Composer reads checkpoint files with;
- :mod:`~composer_se.composer_plumbing.checkpoint_format`: where a Composer checkpoint
  keeps the model's state dict and the algorithms it was saved with;
- :mod:`~composer_se.composer_plumbing.models`: the network inside a Composer model, and
  the mark Composer's own SE leaves on a conv.

None of them imports Composer when imported: the registration, the guard and the reader
import it when called; ``checkpoint_format`` and ``models`` never do, so the torch-only
surgery and planner use ``models``. This ``__init__`` imports nothing.
"""
