"""The pipeline's stages: each reads the files of the stages before it and writes its own, atomically.

index -> ingest -> register -> quantify -> dosimetry -> cohort; :mod:`prrtquant.stages.layout` says what
every stage writes and how it is read back.
"""
