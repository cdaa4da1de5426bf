"""The DuckDB store (the only duckdb importer): schema, migrations, writes, queries; vector indexes."""
