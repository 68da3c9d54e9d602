"""actprm report: one self-contained HTML page built from what a daemon keeps on disk."""
