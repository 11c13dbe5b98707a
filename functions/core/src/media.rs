//! Media types of stored outputs: the one table between a content type and the file
//! extension an output is stored under (`tasks/{id}/output-{i}.{ext}`), read both ways: by the
//! processor when it names an upstream's output, and by the local runtime when it serves one.

/// Extension and content type, the first row for an extension being the type it is served as.
const TYPES: [(&str, &str); 14] = [
    ("gif", "image/gif"),
    ("png", "image/png"),
    ("jpg", "image/jpeg"),
    ("webp", "image/webp"),
    ("mp4", "video/mp4"),
    ("webm", "video/webm"),
    ("mp3", "audio/mpeg"),
    ("wav", "audio/wav"),
    ("wav", "audio/x-wav"),
    ("json", "application/json"),
    ("txt", "text/plain; charset=utf-8"),
    ("txt", "text/plain"),
    ("bin", "application/octet-stream"),
    ("jpg", "image/jpg"),
];

/// The extension to store an output of `content_type` under (`bin` when unknown). Parameters
/// such as `; charset=utf-8` and letter case are ignored.
pub fn extension_for(content_type: &str) -> &'static str {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    TYPES
        .iter()
        .find(|(_, t)| t.split(';').next() == Some(essence.as_str()))
        .map_or("bin", |(ext, _)| ext)
}

/// The content type a stored output with extension `ext` is served as.
pub fn content_type_for(ext: &str) -> &'static str {
    TYPES
        .iter()
        .find(|(e, _)| *e == ext)
        .map_or("application/octet-stream", |(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_extension_is_served_as_a_type_that_is_stored_under_it_again() {
        for (ext, _) in TYPES {
            assert_eq!(extension_for(content_type_for(ext)), ext, "{ext}");
        }
        assert_eq!(extension_for("Image/GIF"), "gif");
        assert_eq!(extension_for("text/plain; charset=latin1"), "txt");
        assert_eq!(extension_for("application/x-unknown"), "bin");
        assert_eq!(content_type_for("txt"), "text/plain; charset=utf-8");
        assert_eq!(content_type_for("exe"), "application/octet-stream");
    }
}
