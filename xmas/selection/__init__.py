"""Selection rules of the methods XMAS is compared with, on features a stage has computed (numpy in, indices
out; no model, no files): COINCIDE (:mod:`xmas.selection.coincide`) and SemDeDup
(:mod:`xmas.selection.semdedup`), as their authors' code (G-JWLee/COINCIDE_code) implements them."""
