"""The production profile: its one description (spec), the launcher on one machine (local), the manifests (generate)."""
