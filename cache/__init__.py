"""The zarr feature store: layout, codecs, validity key, resumable writer, streaming reader, compact encodings."""
