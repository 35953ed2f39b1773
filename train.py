"""Entry point for every stage: ``python train.py {fit,validate,test,predict} --config FILE``.

The CLI itself (:class:`tools.cli.StoryCLI`, :func:`tools.cli.cli_main`) lives in :mod:`tools.cli`;
``cli_main`` is re-exported here, so ``from train import cli_main`` keeps working in notebooks.
``python train.py fit --config X --ckpt_path last`` resumes an interrupted run.
"""

from tools.cli import StoryCLI, cli_main

__all__ = ["StoryCLI", "cli_main"]

if __name__ == "__main__":
    cli_main()
