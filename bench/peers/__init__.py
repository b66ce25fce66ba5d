"""The peers benchmark: the same scan-to-pay workload with coupons on
PostgreSQL, Redis, SQLite, a naive Python ledger and Scanpay (README.md)."""
