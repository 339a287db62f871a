"""FT components: pure functions of data to FT. No database, request or environment here."""
