"""Reports: the papers' published numbers and tables of runs beside them (`reports.paper`)."""
