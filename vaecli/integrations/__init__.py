"""vaecli where people already decode: inside diffusers pipelines (`vaecli.integrations.diffusers`)."""
