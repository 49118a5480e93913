"""The product surface: job spec, REST service, worker and CLI."""
