"""cachetune's face: the `pipeline` command line, data sources and reports."""
