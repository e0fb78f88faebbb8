"""The converted-model directory format: schema, writer and reader."""
