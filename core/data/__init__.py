"""Data for the prepare_data stage and the loops after it.

`sources.py` reads a source into memory (scikit-learn sets, CSV/Parquet, text, synthetic),
`preprocess.py` splits and encodes it, `prepared.py` stores and reads the resulting arrays,
`loaders.py` serves them as resumable DataLoaders, `spec.py` describes them to the models.
"""
