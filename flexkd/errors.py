"""Errors the pipeline reports to the user as one line, without a traceback."""


class StageError(RuntimeError):
    """A stage failed for a reason the user can fix; the message is one line naming the stage,
    e.g. ``tokenize: data.train (/x/train.tsv): missing column 'text'; columns are: sentence, label``."""
