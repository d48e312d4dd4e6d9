"""Training datasets in every format Tunery accepts: read in a streaming pass, validated, converted into one
internal form (`Example`) that the trainer consumes.

`containers` reads a file's records within limits, `converters` turns each record into an `Example`, and
`report` checks a whole dataset (problems, statistics, personal data). The rest of Tunery imports from here.
"""

from shared.data.formats.containers import DataFormatError, DataLimits, detect_container
from shared.data.formats.converters import FORMATS, Example, detect_format, read_examples
from shared.data.formats.report import DatasetCheck, check_dataset

__all__ = [
    "FORMATS",
    "DataFormatError",
    "DataLimits",
    "DatasetCheck",
    "Example",
    "check_dataset",
    "detect_container",
    "detect_format",
    "read_examples",
]
