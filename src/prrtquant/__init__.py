"""prrtquant: quantification of liver-directed PRRT trials from DICOM (PET ER, lobar T/N, dosimetry)."""

__version__ = "0.1.0"
