"""Every exception prrtquant raises on input it cannot interpret (one home; each names the file and the problem).

All are :class:`ValueError` subclasses of :class:`PrrtquantError`, so the command line turns any of them into
one clear line (and, with ``--on-error record``, a ``FAILED.json`` that later stages pass on).

>>> issubclass(SuvError, PrrtquantError) and issubclass(EmptyRegionError, QuantifyError)
True
"""

from __future__ import annotations

import datetime

__all__ = ["PrrtquantError", "ConfigError", "StageInputError", "CorruptImageError", "SeriesError", "SuvError",
           "NMGeometryError", "NMValueError", "InjectionAfterScanError", "MaskError", "SegError", "IngestError",
           "RegisterError", "QuantifyError", "EmptyRegionError", "DosimetryError", "ImplausibleValue",
           "PhysicalBoundsError"]


class PrrtquantError(ValueError):
    """Input prrtquant cannot interpret; the message names the file (or series, key) and the problem."""


# ---------------------------------------------------------------------------------------- configuration, files

class ConfigError(PrrtquantError):
    """A configuration that does not follow the schema (the message names the file and the key)."""


class StageInputError(PrrtquantError):
    """A file a stage needs from an earlier stage is missing."""


class CorruptImageError(PrrtquantError):
    """A stage's NIfTI intermediate that is not what was written (truncated, emptied, modified)."""


# ---------------------------------------------------------------------------------------- DICOM

class SeriesError(PrrtquantError):
    """A series that cannot become one regular 3-D image."""


class SuvError(PrrtquantError):
    """A PET series that cannot be converted to Bq/mL or SUV; the message names the series and why."""


class NMGeometryError(PrrtquantError):
    """An NM (SPECT) object whose frames cannot be placed in patient space."""


class NMValueError(PrrtquantError):
    """Pixel values whose meaning the header does not make clear (the message names the tags)."""


class InjectionAfterScanError(PrrtquantError):
    """The recorded injection lies more than the tolerance after the scan start.

    Attributes
    ----------
    injection : datetime.datetime
        The injection date-time as recorded (what was refused).
    """

    def __init__(self, message: str, injection: datetime.datetime) -> None:
        super().__init__(message)
        self.injection = injection


class MaskError(PrrtquantError):
    """A structure set that cannot be placed on the image it should belong to."""


class SegError(PrrtquantError):
    """A DICOM SEG that cannot be read, or that does not fit the grid it is decoded onto.

    The message always names the file and the problem.
    """


# ---------------------------------------------------------------------------------------- stages

class IngestError(PrrtquantError):
    """Bad input: the message names the file or series and the problem."""


class RegisterError(PrrtquantError):
    """Registration input that cannot be used (no reference, no mask source, a session without a CT)."""


class QuantifyError(PrrtquantError):
    """Inputs that cannot be quantified as asked (grid mismatch, empty mask, invalid numbers)."""


class EmptyRegionError(QuantifyError):
    """A mask with no voxel in the image's field of view (e.g. a lesion outside a PET's axial coverage)."""


class DosimetryError(PrrtquantError):
    """Dosimetry input that cannot be used (e.g. a SPECT not in Bq/mL without decay correction)."""


# ---------------------------------------------------------------------------------------- checks

class ImplausibleValue(PrrtquantError):
    """A header or sheet value outside the range any real patient's data lies in."""


class PhysicalBoundsError(PrrtquantError):
    """Numbers no patient can have (raised only when the run is set to fail on them)."""
