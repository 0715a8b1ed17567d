"""Storage tiers (one per medium) and the manager that composes them."""
