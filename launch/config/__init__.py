"""What a run is asked to do: the typed training config (`training`), its --help (`cli_help`) and the
warnings for settings that are valid but cannot do what they seem to ask (`warnings`)."""
