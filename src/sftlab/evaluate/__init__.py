"""`sftlab eval` and `sftlab report`: base-vs-tuned runs, benchmark task files, the code sandbox, the HTML report."""
