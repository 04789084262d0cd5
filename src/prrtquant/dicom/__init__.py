"""Reading (and writing) DICOM: every value-bearing tag read by one module, every refusal named.

``values`` parses DICOM value representations (and the series date-time rule); ``index`` walks an export
and reads each header once; ``series`` stacks slices; ``pet`` converts PET to Bq/mL and SUV (QIBA rules,
vendor private tags); ``spect`` reads NM values (Real World Value Mapping, rescale, decay correction,
counts -> Bq/mL); ``radiopharmaceutical`` holds the injection time, dose and nuclide rules; ``rtstruct``
and ``seg`` turn contours and segmentations into masks on a grid; ``write`` and ``rtdose`` write DICOM.
"""
