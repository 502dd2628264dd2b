"""``python -m grain.train ...`` = ``grain train ...`` (what torchrun launches: ``torchrun -m grain.train``)."""

import sys

from grain.cli import app

if __name__ == "__main__":
    app(["train", *sys.argv[1:]], prog_name="python -m grain.train")
