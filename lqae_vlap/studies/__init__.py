"""Studies: several training runs and their evaluations, summarised in one table."""
