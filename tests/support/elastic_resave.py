"""``python tests/support/elastic_resave.py OUT <train overrides>``: ``mtrain.train`` that,
right after resuming, also saves the state it loaded as a checkpoint of ``OUT`` (a run
directory), then trains on. What a resume on another number of ranks loaded can then be
compared, file by file, with what the old ranks saved."""

import sys

from mtrain.runs.run_dir import RunDir
from mtrain.training.trainer import Trainer

OUT = RunDir(sys.argv.pop(1))
_resume = Trainer._resume


def resume_and_save(self, checkpointer) -> None:
    _resume(self, checkpointer)
    run_dir, checkpointer.run_dir = checkpointer.run_dir, OUT
    checkpointer.save(self.step)
    checkpointer.run_dir = run_dir


Trainer._resume = resume_and_save

if __name__ == "__main__":
    from mtrain.train import main

    main()
