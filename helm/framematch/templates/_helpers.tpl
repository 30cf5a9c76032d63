{{/*
Names, labels and the small decisions every template shares.
*/}}

{{/* Chart name, overridable. */}}
{{- define "framematch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, at most 63 characters (DNS label). The release name is used alone when
it already contains the chart name.
*/}}
{{- define "framematch.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "framematch.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "framematch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "framematch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "framematch.labels" -}}
helm.sh/chart: {{ include "framematch.chart" . }}
{{ include "framematch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: matcher
{{- end }}

{{- define "framematch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "framematch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "framematch.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* "postgres" or "embedded": which store, hence Deployment or StatefulSet. */}}
{{- define "framematch.mode" -}}
{{- if .Values.store.postgres.enabled }}postgres{{ else }}embedded{{ end }}
{{- end }}

{{/* The Secret holding the PostgreSQL URL: the operator's, or the one this chart creates. */}}
{{- define "framematch.postgresSecretName" -}}
{{- if .Values.store.postgres.existingSecret }}
{{- .Values.store.postgres.existingSecret }}
{{- else }}
{{- printf "%s-postgres" (include "framematch.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* The headless Service: the StatefulSet's governing Service, and DNS-based balancing. */}}
{{- define "framematch.headlessName" -}}
{{- printf "%s-headless" (include "framematch.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Refuses value combinations that would render something broken, with a message naming the value.
Called from every workload template.
*/}}
{{- define "framematch.validate" -}}
{{- $pg := .Values.store.postgres }}
{{- if and $pg.enabled (not $pg.existingSecret) (not $pg.url) }}
{{- fail "store.postgres.enabled needs store.postgres.existingSecret (recommended) or store.postgres.url" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not $pg.enabled) }}
{{- fail "autoscaling.enabled needs store.postgres.enabled: the embedded SQLite store runs exactly one replica" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas is larger than autoscaling.maxReplicas" }}
{{- end }}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if and $pdb.enabled (not (kindIs "invalid" $pdb.minAvailable)) (not (kindIs "invalid" $pdb.maxUnavailable)) }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable, not both (null the other)" }}
{{- end }}
{{- if and $pdb.enabled (kindIs "invalid" $pdb.minAvailable) (kindIs "invalid" $pdb.maxUnavailable) }}
{{- fail "podDisruptionBudget.enabled needs minAvailable or maxUnavailable" }}
{{- end }}
{{- if le (int .Values.terminationGracePeriodSeconds) (div (int .Values.server.shutdownGraceMs) 1000) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed server.shutdownGraceMs (%d ms), or Kubernetes kills open streams before framematch ends them" (int .Values.terminationGracePeriodSeconds) (int .Values.server.shutdownGraceMs)) }}
{{- end }}
{{- end }}

{{/* The framematch container, shared by the StatefulSet and the Deployment. */}}
{{- define "framematch.container" -}}
- name: framematch
  image: {{ include "framematch.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - serve
  ports:
    - name: grpc
      containerPort: {{ .Values.server.grpcPort }}
      protocol: TCP
    - name: metrics
      containerPort: {{ .Values.server.metricsPort }}
      protocol: TCP
  env:
    - name: FRAMEMATCH_LISTEN
      value: {{ printf "%s:%d" .Values.server.listenHost (int .Values.server.grpcPort) | quote }}
    - name: FRAMEMATCH_METRICS_LISTEN
      value: {{ printf "%s:%d" .Values.server.listenHost (int .Values.server.metricsPort) | quote }}
    {{- if .Values.store.postgres.enabled }}
    - name: FRAMEMATCH_STORE
      valueFrom:
        secretKeyRef:
          name: {{ include "framematch.postgresSecretName" . }}
          key: {{ .Values.store.postgres.secretKey }}
    - name: FRAMEMATCH_TAIL_INTERVAL_MS
      value: {{ .Values.store.postgres.tailIntervalMs | quote }}
    {{- else }}
    - name: FRAMEMATCH_DATA_DIR
      value: {{ .Values.store.embedded.dataDir | quote }}
    {{- end }}
    {{- with .Values.auth }}
    {{- if .bootstrapAdminKeySecret }}
    - name: FRAMEMATCH_BOOTSTRAP_ADMIN_KEY
      valueFrom:
        secretKeyRef:
          name: {{ .bootstrapAdminKeySecret }}
          key: {{ .bootstrapAdminKeySecretKey }}
    {{- end }}
    {{- if .insecureNoAuth }}
    - name: FRAMEMATCH_INSECURE_NO_AUTH
      value: "true"
    {{- end }}
    {{- end }}
    - name: FRAMEMATCH_LOG_FORMAT
      value: {{ .Values.server.logFormat | quote }}
    - name: RUST_LOG
      value: {{ .Values.server.logLevel | quote }}
    - name: FRAMEMATCH_INDEX_ENGINE
      value: {{ .Values.server.indexEngine | quote }}
    - name: FRAMEMATCH_MAX_DISTANCE
      value: {{ .Values.server.maxDistance | quote }}
    - name: FRAMEMATCH_MIN_QUALITY
      value: {{ .Values.server.minQuality | quote }}
    - name: FRAMEMATCH_MAX_IMAGE_BYTES
      value: {{ int64 .Values.server.maxImageBytes | quote }}
    - name: FRAMEMATCH_MAX_PIXELS
      value: {{ int64 .Values.server.maxPixels | quote }}
    - name: FRAMEMATCH_MAX_DECODE_BYTES
      value: {{ int64 .Values.server.maxDecodeBytes | quote }}
    - name: FRAMEMATCH_DECODE_MEMORY
      value: {{ int64 .Values.server.decodeMemory | quote }}
    - name: FRAMEMATCH_MAX_FRAMES_PER_STREAM
      value: {{ int64 .Values.server.maxFramesPerStream | quote }}
    - name: FRAMEMATCH_MAX_CONCURRENT_STREAMS
      value: {{ int64 .Values.server.maxConcurrentStreams | quote }}
    - name: FRAMEMATCH_HASH_WORKERS
      value: {{ int64 .Values.server.hashWorkers | quote }}
    - name: FRAMEMATCH_MAX_QUEUED_HASHES
      value: {{ int64 .Values.server.maxQueuedHashes | quote }}
    - name: FRAMEMATCH_SHUTDOWN_GRACE_MS
      value: {{ int64 .Values.server.shutdownGraceMs | quote }}
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: POD_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    - name: NODE_NAME
      valueFrom:
        fieldRef:
          fieldPath: spec.nodeName
    {{- with .Values.otel }}
    {{- if .endpoint }}
    - name: OTEL_EXPORTER_OTLP_ENDPOINT
      value: {{ .endpoint | quote }}
    - name: OTEL_TRACES_EXPORTER
      value: {{ .tracesExporter | quote }}
    - name: OTEL_METRICS_EXPORTER
      value: {{ .metricsExporter | quote }}
    - name: OTEL_METRIC_EXPORT_INTERVAL
      value: {{ int64 .metricExportIntervalMs | quote }}
    {{- if .headersSecret.name }}
    - name: OTEL_EXPORTER_OTLP_HEADERS
      valueFrom:
        secretKeyRef:
          name: {{ .headersSecret.name }}
          key: {{ .headersSecret.key }}
    {{- end }}
    {{- end }}
    - name: OTEL_SERVICE_NAME
      value: {{ .serviceName | quote }}
    - name: OTEL_RESOURCE_ATTRIBUTES
      value: {{ printf "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),k8s.node.name=$(NODE_NAME)%s" (ternary (printf ",%s" .resourceAttributes) "" (ne .resourceAttributes "")) | quote }}
    {{- end }}
    {{- with .Values.server.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.server.extraEnvFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.probes.startup }}
  {{- if .enabled }}
  startupProbe:
    grpc:
      port: {{ int $.Values.server.grpcPort }}
      {{- if .service }}
      service: {{ .service | quote }}
      {{- end }}
    periodSeconds: {{ .periodSeconds }}
    timeoutSeconds: {{ .timeoutSeconds }}
    failureThreshold: {{ .failureThreshold }}
  {{- end }}
  {{- end }}
  {{- with .Values.probes.readiness }}
  {{- if .enabled }}
  readinessProbe:
    grpc:
      port: {{ int $.Values.server.grpcPort }}
      {{- if .service }}
      service: {{ .service | quote }}
      {{- end }}
    periodSeconds: {{ .periodSeconds }}
    timeoutSeconds: {{ .timeoutSeconds }}
    failureThreshold: {{ .failureThreshold }}
    successThreshold: {{ .successThreshold }}
  {{- end }}
  {{- end }}
  {{- with .Values.probes.liveness }}
  {{- if .enabled }}
  livenessProbe:
    grpc:
      port: {{ int $.Values.server.grpcPort }}
      {{- if .service }}
      service: {{ .service | quote }}
      {{- end }}
    periodSeconds: {{ .periodSeconds }}
    timeoutSeconds: {{ .timeoutSeconds }}
    failureThreshold: {{ .failureThreshold }}
  {{- end }}
  {{- end }}
  {{- with .Values.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    {{- if not .Values.store.postgres.enabled }}
    - name: data
      mountPath: {{ .Values.store.embedded.dataDir }}
    {{- end }}
{{- end }}

{{/* Pod-level settings shared by both workloads. */}}
{{- define "framematch.podSpecCommon" -}}
serviceAccountName: {{ include "framematch.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
enableServiceLinks: false
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod template annotations: roll the pods when the chart-created database Secret changes. */}}
{{- define "framematch.podAnnotations" -}}
{{- if and .Values.store.postgres.enabled (not .Values.store.postgres.existingSecret) }}
checksum/postgres-secret: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}
