"""Loading and resuming recipe runs: checkpoints checked against the model, autoresume after a kill.

- :func:`composer_loads_safely` makes Composer's checkpoint loader read files with
  :func:`~composer_se.recipes.safe_load.read_checkpoint` and check their model state
  against the model (:func:`~composer_se.checkpoints.check_model_state`, with advice in
  the recipe's terms), before any tensor is copied into the model. The recipe runner
  builds its ``Trainer`` inside it.
- :func:`prepare_autoresume` makes a save folder that a killed run left behind
  resumable: checkpoint files newer than the one ``latest-rank0.pt`` points to are
  moved into ``<save_folder>/orphaned-checkpoints/``.
"""

from __future__ import annotations

import contextlib
import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import Iterator, Optional

from torch import nn

from composer_se.checkpoints import CheckpointError, Wording, check_model_state
from composer_se.composer_plumbing.checkpoint_format import model_state_of, saved_squeeze_excite
from composer_se.composer_plumbing.checkpoint_reader import composer_reads_checkpoints_with
from composer_se.recipes.safe_load import read_checkpoint

__all__ = ['ORPHANS_FOLDER', 'RECIPE_WORDING', 'checkpoint_files', 'composer_loads_safely', 'prepare_autoresume']

#: Composer's default checkpoint file name (``ep{epoch}-ba{batch}-rank{rank}.pt``) and latest link.
CHECKPOINT_NAME = re.compile(r'^ep(\d+)-ba(\d+)-rank(\d+)\.pt$')
LATEST_LINK = 'latest-rank0.pt'
#: Where :func:`prepare_autoresume` moves the checkpoint files that a resumed run must not see.
ORPHANS_FOLDER = 'orphaned-checkpoints'


#: What a recipe run tells the user, naming the recipe keys to change.
RECIPE_WORDING = Wording(
    no_se_saved='pass the file as model.weights instead of checkpoint.load_path: its weights are loaded before SE is '
    'added, and the SE blocks start from their initialisation. If this is the save folder of a run without SE, give '
    'the SE run its own checkpoint.save_folder',
    no_se_model='add algorithms.squeeze_excite with the arguments of {saved}',
    se='set algorithms.squeeze_excite to the arguments of the run that saved it, or give a different run its own '
    'checkpoint.save_folder',
    other='use the model settings (model.name, model.num_classes) of the run that saved it',
)


@contextlib.contextmanager
def composer_loads_safely(model: nn.Module, *, source: str, current_call: Optional[str] = None) -> Iterator[None]:
    """Within it, Composer reads checkpoints with :func:`read_checkpoint` and checks them against ``model``.

    Build the ``Trainer`` inside it. Composer's loader (``torch.load`` with
    ``weights_only=False``) is replaced by :func:`read_checkpoint`, and the
    checkpoint's model state must match ``model`` entry for entry
    (:func:`check_model_state`) before Composer copies anything into it. ``source``
    names the checkpoint in messages (Composer reads a temporary copy of it).
    """

    def read(path, map_location):
        checkpoint = read_checkpoint(path, map_location, name=source)
        check_model_state(model_state_of(checkpoint, source), model, source=source,
                          saved_call=saved_squeeze_excite(checkpoint), current_call=current_call,
                          wording=RECIPE_WORDING)
        return checkpoint

    with composer_reads_checkpoints_with(read):
        yield


def checkpoint_files(folder: str | os.PathLike) -> list[tuple[int, str]]:
    """``(batch, file name)`` of the checkpoint files Composer wrote in ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(2)), name) for name in os.listdir(folder) if (m := CHECKPOINT_NAME.match(name))]
    return sorted(found)


def _intact(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError):
        return False


def prepare_autoresume(folder: str | os.PathLike) -> tuple[Optional[str], list[str]]:
    """Makes save folder ``folder`` resumable by Composer's autoresume; call it on one process only.

    Composer writes ``ep{E}-ba{B}-rank0.pt``, then points ``latest-rank0.pt`` at it.
    A run killed in between leaves a checkpoint file newer than the link (complete,
    or cut short), and Composer's resumed run then stops, as that file "may conflict
    with a future checkpoint". So:

    - with a link: every checkpoint file newer than its target is moved into
      ``folder/orphaned-checkpoints/`` (never deleted);
    - without a link (killed between Composer removing and re-creating it, or during
      the first save): the link is re-created to the newest checkpoint whose zip
      checksums pass, and newer files are moved aside; with none intact, all are moved
      aside and the run starts over.

    A link to a file that does not exist is an error. A link made by hand to a file
    of another name, or a plain file in the link's place, is left as it is (Composer
    loads what it points to).

    Returns:
        The checkpoint the run will resume from (``None`` for a fresh start) and one
        line per thing done, for the user.

    Raises:
        CheckpointError: ``latest-rank0.pt`` points to a file that does not exist.
    """
    folder = Path(folder)
    files = checkpoint_files(folder)
    link = folder / LATEST_LINK
    notes: list[str] = []
    if link.is_symlink():
        target = folder / os.readlink(link)
        if not target.is_file():
            raise CheckpointError(
                f'{link} points to {target}, which does not exist, so autoresume cannot continue the run. Restore '
                f'that file, or delete {link} to start the run over (its other checkpoints are then set aside).',
            )
        match = CHECKPOINT_NAME.match(target.name)
        if match is None or target.parent.resolve() != folder.resolve():
            return str(target), notes
        resumed_batch, resumed = int(match.group(2)), str(target)
    elif link.exists():  # a plain file where the link belongs: Composer loads it as it is
        return str(link), notes
    else:
        resumed_batch, resumed = -1, None
        for batch, name in reversed(files):
            if name.endswith('-rank0.pt') and _intact(folder / name):
                os.symlink(name, link)
                resumed_batch, resumed = batch, str(folder / name)
                notes.append(f'{link} was missing; it now points to {name}, the newest intact checkpoint')
                break
    orphans = [name for batch, name in files if batch > resumed_batch]
    if orphans:
        aside = folder / ORPHANS_FOLDER
        aside.mkdir(exist_ok=True)
        for name in orphans:
            destination, copy = aside / name, 1
            while destination.exists():
                destination, copy = aside / f'{name}.{copy}', copy + 1
            os.replace(folder / name, destination)
        notes.append(f'moved {len(orphans)} checkpoint file(s) newer than the one autoresume continues from, left by '
                     f'a run killed while saving, into {aside}: {", ".join(orphans)}')
    return resumed, notes
