"""Figures drawn only from the tidy result files (JSON/CSV) the analysis writes, in one shared style."""
