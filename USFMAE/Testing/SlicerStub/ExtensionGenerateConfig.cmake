file(APPEND "${USFMAE_STUB_MANIFEST}" "generate-config|${EXTENSION_DEPENDS}\n")
