"""Prediction: plan → loader workers → runtime → spool → ingest; background jobs, Ray, the model hub."""
