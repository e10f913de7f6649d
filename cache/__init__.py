"""The zarr feature store: layout, codecs, validity key, resumable writer, streaming reader."""
import warnings

# BitRound is a numcodecs filter, outside the zarr v3 spec: known and intended for opt-in lossy stores.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")
