use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const H1: &str = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22";
const H2: &str = "30a10efd71cc3d429013d48d0ffffc52e34e0e17ada952a9d29685211ea9e5af";

fn hash(hex: &str) -> PdqHash {
    hex.parse().expect("test hash")
}

fn frame(frame_index: u32, timestamp_ms: u64, hex: &str, quality: u8) -> FrameSignal {
    FrameSignal {
        frame_index,
        timestamp_ms,
        hash: hash(hex),
        quality,
    }
}

fn item(external_id: &str, note: &str, frames: Vec<FrameSignal>) -> Item {
    Item {
        external_id: external_id.to_string(),
        note: note.to_string(),
        withdrawn: None,
        frames,
        embeddings: Vec::new(),
    }
}

fn write_all(format: Format, items: &[Item]) -> Result<(String, Vec<Written>), io::Error> {
    let mut writer = Writer::new(format, "attacks", Category::GraphicViolence, Vec::new())?;
    let written = items
        .iter()
        .map(|i| writer.write(i))
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = writer.finish()?;
    Ok((String::from_utf8(bytes).expect("utf-8 output"), written))
}

fn items(parsed: &Parsed) -> Vec<Item> {
    parsed.items.iter().map(|l| l.item.clone()).collect()
}

fn error_line(result: Result<Parsed, Error>) -> (usize, String) {
    match result {
        Ok(parsed) => panic!("parsed, expected an error: {parsed:?}"),
        Err(error) => (error.line, error.to_string()),
    }
}

/// A video whose frame 30 has bars: two signals at one frame index.
fn video() -> Item {
    item(
        "case 12/a",
        "filmed attack, \"north\" camera; 2nd copy",
        vec![
            frame(0, 0, H1, 100),
            frame(30, 1001, H2, 87),
            frame(30, 1001, H1, 42),
            frame(61, 2034, H2, 100),
        ],
    )
}

#[test]
fn format_names_round_trip() {
    for format in Format::ALL {
        assert_eq!(format.as_str().parse::<Format>(), Ok(format));
    }
    assert!("json".parse::<Format>().is_err());
}

#[test]
fn pdq_lines_in_every_field_form() -> TestResult {
    let upper = H2.to_uppercase();
    let text = format!(
        "# a comment\n\npdq {H1}\n{upper}\n{H1},42,photos/my photo.jpg\n{H2},7\nvideo_md5 d41d8cd98f00b204e9800998ecf8427e\n"
    );
    assert_eq!(sniff(&text)?, Format::Pdq);
    let parsed = parse(Format::Pdq, &text)?;
    let got: Vec<(usize, FrameSignal)> = parsed
        .items
        .iter()
        .map(|l| (l.line, l.item.frames[0]))
        .collect();
    assert_eq!(
        got,
        vec![
            (3, frame(0, 0, H1, 100)),
            (4, frame(0, 0, H2, 100)),
            (5, frame(0, 0, H1, 42)),
            (6, frame(0, 0, H2, 7)),
        ]
    );
    assert_eq!(parsed.skipped.len(), 1);
    assert_eq!(parsed.skipped[0].line, 7);
    assert!(parsed.skipped[0].reason.contains("video_md5"));
    Ok(())
}

#[test]
fn malformed_pdq_lines_name_their_line() {
    let short = &H1[..63];
    for (text, line, needle) in [
        (format!("pdq {H1}\npdq {short}\n"), 2, "63"),
        (format!("{H1}\n\n{H1},101\n"), 3, "quality \"101\""),
        (format!("{H1}\n{H1}x\n"), 2, "expected"),
        (format!("{H1} extra\n"), 1, "expected"),
        ("pdq\n".to_string(), 1, "expected"),
        (format!("pdq {H1} {H2}\n"), 1, "not a PDQ hash"),
    ] {
        let (got, message) = error_line(parse(Format::Pdq, &text));
        assert_eq!(got, line, "{text:?}: {message}");
        assert!(message.starts_with(&format!("line {line}: ")), "{message}");
        assert!(message.contains(needle), "{text:?}: {message}");
    }
}

#[test]
fn pdq_export_keeps_quality_and_skips_what_it_cannot_hold() -> TestResult {
    let withdrawn = Item {
        withdrawn: Some("false positive".to_string()),
        ..item("", "", vec![frame(0, 0, H1, 100)])
    };
    let images = [
        item("x", "", vec![frame(0, 0, H1, 100)]),
        item("", "", vec![frame(0, 0, H2, 40)]),
        video(),
        withdrawn,
    ];
    let (text, written) = write_all(Format::Pdq, &images)?;
    assert_eq!(text, format!("pdq {H1}\n{H2},40\n"));
    assert_eq!(written[..2], [Written::Wrote, Written::Wrote]);
    assert!(matches!(&written[2], Written::Skipped(r) if r.contains("4 frames")));
    assert!(matches!(&written[3], Written::Skipped(r) if r.contains("withdrawn")));
    // Quality survives the round trip; ids and notes are not in this format.
    let back = items(&parse(Format::Pdq, &text)?);
    assert_eq!(
        back,
        vec![
            item("", "", vec![frame(0, 0, H1, 100)]),
            item("", "", vec![frame(0, 0, H2, 40)])
        ]
    );
    Ok(())
}

#[test]
fn csv_round_trip_with_quoting() -> TestResult {
    let image = item("id with spaces, and commas", "", vec![frame(0, 0, H1, 100)]);
    let low = item("", "naïve note %41", vec![frame(0, 0, H2, 12)]);
    let videos = [video()];
    let all = [image.clone(), low.clone(), videos[0].clone()];
    let (text, written) = write_all(Format::Csv, &all)?;
    assert!(written.iter().all(|w| *w == Written::Wrote));
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("signal_type,signal_str,collab,category,tags")
    );
    assert_eq!(
        lines.next(),
        Some(
            format!(
                "pdq,{H1},attacks,graphic_violence,external_id=id%20with%20spaces%2C%20and%20commas"
            )
            .as_str()
        )
    );
    // The JSON signal holds commas and quotes: the cell is quoted, quotes doubled.
    let third = lines.nth(1).unwrap_or_default();
    assert!(
        third.starts_with(&format!("vpdq,\"[\"\"{H1},100,0.000\"\",")),
        "{third}"
    );
    assert_eq!(sniff(&text)?, Format::Csv);
    let back = parse(Format::Csv, &text)?;
    assert!(back.skipped.is_empty());
    assert_eq!(
        back.items.iter().map(|l| l.line).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    // HMA's JSON form numbers frames by position: the video comes back renumbered.
    let mut renumbered = video();
    for (position, frame) in renumbered.frames.iter_mut().enumerate() {
        frame.frame_index = u32::try_from(position)?;
    }
    assert_eq!(items(&back), vec![image, low, renumbered]);
    Ok(())
}

#[test]
fn csv_reads_pytx_files_in_any_column_order_and_skips_what_it_must() -> TestResult {
    // python-threatexchange's DictWriter puts collab first.
    let vpdq_text = format!("0,100,{H1},0.000\n30,90,{H2},1.001");
    let text = format!(
        "collab,signal_type,signal_str,category,tags\n\
         Sample,pdq,{H1},TRUE_POSITIVE,media_type_photo\n\
         Sample,video_md5,d41d8cd98f00b204e9800998ecf8427e,TRUE_POSITIVE,\n\
         Sample,pdq,{H2},FALSE_POSITIVE,\n\
         Sample,vpdq,\"{vpdq_text}\",WORTH_INVESTIGATING,note=kept a b\n\
         Sample,pdq,{H2},gore,\n\
         Sample,pdq,{H2},,withdrawn=fp\n"
    );
    let parsed = parse(Format::Csv, &text)?;
    assert_eq!(
        items(&parsed),
        vec![
            item("", "tags: media_type_photo", vec![frame(0, 0, H1, 100)]),
            item(
                "",
                "kept; tags: a b",
                vec![frame(0, 0, H1, 100), frame(30, 1001, H2, 90)]
            ),
        ]
    );
    // The vpdq cell spans two lines: the row starts on line 5.
    assert_eq!(parsed.items[1].line, 5);
    let skipped: Vec<(usize, bool)> = parsed
        .skipped
        .iter()
        .map(|s| (s.line, !s.reason.is_empty()))
        .collect();
    assert_eq!(skipped, [(3, true), (4, true), (7, true), (8, true)]);
    assert!(parsed.skipped[0].reason.contains("video_md5"));
    assert!(parsed.skipped[1].reason.contains("FALSE_POSITIVE"));
    assert!(parsed.skipped[2].reason.contains("gore"));
    assert!(parsed.skipped[3].reason.contains("withdrawn"));
    Ok(())
}

#[test]
fn malformed_csv_names_its_line() {
    let header = "signal_type,signal_str,collab,category,tags";
    for (text, line, needle) in [
        ("signal,signal_str\npdq,x\n".to_string(), 1, "signal_type"),
        (
            format!("{header}\npdq,{H1},c,other,\npdq,{H1},c\n"),
            3,
            "fields",
        ),
        (
            format!("{header}\npdq,{H1},c,other,\npdq,abc,c,other,\n"),
            3,
            "not a PDQ hash",
        ),
        (
            format!("{header}\n\nvpdq,\"[\"\"{H1},100\"\"]\",c,other,\n"),
            3,
            "entry 0",
        ),
        (format!("{header}\nvpdq,[],c,other,\n"), 2, "no frames"),
        (
            format!("{header}\npdq,{H1},c,other,note=%zz\n"),
            2,
            "percent",
        ),
    ] {
        let (got, message) = error_line(parse(Format::Csv, &text));
        assert_eq!(got, line, "{text:?}: {message}");
        assert!(message.contains(needle), "{text:?}: {message}");
    }
}

#[test]
fn vpdq_text_round_trips_a_bank_exactly() -> TestResult {
    let withdrawn = Item {
        withdrawn: Some("false positive".to_string()),
        ..item("w", "", vec![frame(0, 0, H2, 100)])
    };
    let image = item("", "", vec![frame(0, 0, H1, 100)]);
    let (text, written) = write_all(Format::Vpdq, &[video(), image.clone(), withdrawn])?;
    assert!(written.iter().all(|w| *w == Written::Wrote));
    assert!(text.starts_with("# reference {\"external_id\":\"case 12/a\""));
    assert!(text.contains(&format!("\n30,87,{H2},1.001\n30,42,{H1},1.001\n")));
    assert_eq!(sniff(&text)?, Format::Vpdq);
    let back = parse(Format::Vpdq, &text)?;
    // Frame numbers, both signals of frame 30, times and qualities all survive.
    assert_eq!(items(&back), vec![video(), image]);
    assert_eq!(back.items[1].line, 6);
    assert_eq!(back.skipped.len(), 1);
    assert_eq!(back.skipped[0].line, 8);
    Ok(())
}

#[test]
fn a_plain_vpdq_file_is_one_video() -> TestResult {
    let text = format!("0,100,{H1},0.000\n\n# comment\n30,87,{H2},1.001\n");
    assert_eq!(sniff(&text)?, Format::Vpdq);
    let parsed = parse(Format::Vpdq, &text)?;
    assert_eq!(
        items(&parsed),
        vec![item(
            "",
            "",
            vec![frame(0, 0, H1, 100), frame(30, 1001, H2, 87)]
        )]
    );
    Ok(())
}

#[test]
fn malformed_vpdq_text_names_its_line() {
    for (text, line, needle) in [
        (
            format!("0,100,{H1},0.000\n1,100,{H1}\n"),
            2,
            "4 comma-separated",
        ),
        (
            format!("# reference {{}}\n0,100,{H1},0.000\n# reference {{\"ext\":1}}\n"),
            3,
            "unknown field",
        ),
        (
            format!("0,100,{H1},0.000\n# reference\n0,100,{H1},0.000\n"),
            1,
            "before the first",
        ),
        (
            format!("# reference\n# reference\n0,100,{H1},0.000\n"),
            1,
            "no frames",
        ),
        (format!("# reference\n0,101,{H1},0.000\n"), 2, "quality"),
        (format!("5000000000,100,{H1},0.000\n"), 1, "over 4294967295"),
    ] {
        let (got, message) = error_line(parse(Format::Vpdq, &text));
        assert_eq!(got, line, "{text:?}: {message}");
        assert!(message.contains(needle), "{text:?}: {message}");
    }
}

#[test]
fn vpdq_json_lines_round_trip_a_bank_exactly() -> TestResult {
    let image = item("only\nline", "", vec![frame(0, 0, H1, 55)]);
    let (text, _) = write_all(Format::VpdqJson, &[video(), image.clone()])?;
    assert_eq!(text.lines().count(), 2);
    assert_eq!(sniff(&text)?, Format::VpdqJson);
    let back = parse(Format::VpdqJson, &text)?;
    assert_eq!(items(&back), vec![video(), image]);
    assert_eq!(back.items[1].line, 2);
    Ok(())
}

#[test]
fn vpdq_json_lines_carry_vectors_and_vector_only_references() -> TestResult {
    let vector = |frame_index: u32, space: &str, values: Vec<f32>| FrameEmbedding {
        frame_index,
        timestamp_ms: u64::from(frame_index) * 40,
        space: space.to_string(),
        vector: values,
    };
    let with_vectors = Item {
        embeddings: vec![
            vector(0, "sscd", vec![0.25, -0.5, 0.125]),
            vector(30, "sscd", vec![1.0e-3, 0.0, -1.0]),
        ],
        ..video()
    };
    let only_vectors = Item {
        embeddings: vec![vector(0, "sscd", vec![0.1, 0.2, 0.3])],
        ..item("v", "", Vec::new())
    };
    let (text, written) = write_all(
        Format::VpdqJson,
        &[with_vectors.clone(), only_vectors.clone()],
    )?;
    assert!(written.iter().all(|w| *w == Written::Wrote));
    assert!(text.contains("\"embeddings\":[{\"frame\":0,\"timestamp_ms\":0,\"space\":\"sscd\""));
    let back = parse(Format::VpdqJson, &text)?;
    assert_eq!(items(&back), vec![with_vectors, only_vectors]);
    // A file without the field reads as before: no vectors.
    assert!(
        !write_all(Format::VpdqJson, &[video()])?
            .0
            .contains("embeddings")
    );
    Ok(())
}

#[test]
fn an_hma_json_signal_is_one_video_with_exponent_timestamps() -> TestResult {
    // python-threatexchange's 3-significant-digit timestamps, pretty-printed over lines.
    let text = format!("\n[\n  \"{H1},100,0.0\",\n  \"{H2},77,1.23e+02\"\n]\n");
    assert_eq!(sniff(&text)?, Format::VpdqJson);
    let parsed = parse(Format::VpdqJson, &text)?;
    assert_eq!(parsed.items[0].line, 2);
    assert_eq!(
        items(&parsed),
        vec![item(
            "",
            "",
            vec![frame(0, 0, H1, 100), frame(1, 123_000, H2, 77)]
        )]
    );
    Ok(())
}

#[test]
fn malformed_vpdq_json_names_its_line() {
    for (text, line, needle) in [
        (format!("[\"{H1},100,0.0\",\n\"{H1},100\"]\n"), 1, "entry 1"),
        ("[\n\"a\",\n".to_string(), 3, "EOF"),
        (
            format!(
                "{{\"vpdq\":[\"{H1},100,0.0\"]}}\n{{\"vpdq\":[\"{H1},100,0.0\"],\"frame_numbers\":[1,2]}}\n"
            ),
            2,
            "2 frame_numbers for 1",
        ),
        (
            format!("{{\"vpdq\":[\"{H1},100,0.0\"]}}\n\n{{\"vpqd\":[]}}\n"),
            3,
            "unknown field",
        ),
        ("{\"vpdq\":[]}\n".to_string(), 1, "no frames"),
    ] {
        let (got, message) = error_line(parse(Format::VpdqJson, &text));
        assert_eq!(got, line, "{text:?}: {message}");
        assert!(message.contains(needle), "{text:?}: {message}");
    }
}

#[test]
fn sniffing_refuses_what_fits_no_format() {
    for (text, line) in [
        ("hello world\n", 1),
        ("# only a comment\n\n", 1),
        ("\n\n1,2\n", 3),
    ] {
        let error = sniff(text).err();
        assert_eq!(error.as_ref().map(|e| e.line), Some(line), "{text:?}");
        assert!(
            error.is_some_and(|e| e.to_string().contains("--format")),
            "{text:?}"
        );
    }
}

#[test]
fn percent_encoding_round_trips_and_rejects_bad_escapes() {
    for text in ["", "plain", "a b,c\"d%e", "naïve – ✓", "tab\tnew\nline"] {
        let encoded = percent_encode(text);
        assert!(!encoded.contains(char::is_whitespace), "{encoded}");
        assert_eq!(percent_decode(&encoded).as_deref(), Some(text));
    }
    for bad in ["%", "%4", "%zz", "%ff"] {
        assert_eq!(percent_decode(bad), None, "{bad}");
    }
}
