"""Stage 1, ingest: readers turn a source (manifest, image folder, WebDataset, DICOM) into records
(`readers`, `wds`, `dicom`, `text_encoding`), each record is checked and fully decoded (`records`,
`parallel`), and `ingest` stores the valid pairs and the rejects with a reason."""
