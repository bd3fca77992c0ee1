"""train_subset.*: the dataset-size axis of the sweep trains on a deterministic subset of the train manifest."""
import json
from pathlib import Path

import pytest

from audiocraft_lora.errors import UserError
from audiocraft_lora.subset import choose_subset, read_manifest_lines
from helpers import DEBUG_ARGS, ROOT, build_solver

TRAIN = ROOT / 'egs' / 'example' / 'train'


def test_solver_trains_on_the_chosen_half_of_the_manifest(dora_dir):
    solver, xp = build_solver(DEBUG_ARGS + ['train_subset.fraction=0.5'])
    subset = Path(xp.folder) / 'train_subset' / 'data.jsonl'
    lines = subset.read_text().splitlines()
    full = read_manifest_lines(TRAIN)
    assert len(lines) == len(full) // 2 and set(lines) < set(full)
    assert [full.index(line) for line in lines] == sorted(full.index(line) for line in lines)  # order kept
    dataset = solver.dataloaders['train'].dataset
    assert sorted(m.path for m in dataset.meta) == sorted(str(ROOT / json.loads(line)['path']) for line in lines)
    assert len(solver.dataloaders['valid'].dataset.meta) == len(read_manifest_lines(ROOT / 'egs/example/valid'))
    # the same seed picks the same files in another XP; another seed, others
    assert choose_subset(8, 0.5, None, 0) == choose_subset(8, 0.5, None, 0) != choose_subset(8, 0.5, None, 1)


@pytest.mark.parametrize('fraction, num_files, match', [
    (0.0, None, r'fraction=0.0 must be in \(0, 1\]'),
    (1.5, None, r'fraction=1.5 must be in \(0, 1\]'),
    (None, 9, 'num_files=9 must be between 1 and the 8 files'),
    (0.5, 4, 'not both'),
])
def test_bad_subset_is_refused(fraction, num_files, match):
    with pytest.raises(UserError, match=match):
        choose_subset(8, fraction, num_files, 0)
