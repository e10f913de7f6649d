"""Stage one: run the frozen backbone over a dataset once and write its layers to the cache."""
